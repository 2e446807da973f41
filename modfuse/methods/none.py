"""Method "none": plain training, the baseline every method is compared with.

loss = L_fused (+ sum_m L_m when unimodal losses are passed: that is the fused+unimodal control, which every
comparison must show beside the methods that add unimodal losses). Gradients are those of `loss.backward()`.
"""

from modfuse.methods import Method, register


@register
class NoMethod(Method):
    name = "none"
    requires = ()

    def __init__(self, groups):
        super().__init__(groups)
