"""Fused operators: each module holds launcher(s), an autograd.Function, the public op and its `<op>_ref` twin."""
