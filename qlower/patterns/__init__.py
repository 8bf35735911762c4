"""Pattern families fused by :mod:`qlower.fuse`: one module per family.

Each family has a detector (``detect(ep, node) -> (match | None, info)``,
where ``info`` names the first failed guard in user words when there is no
match) and a replacement builder (``replace(ep, match, packer)``).
"""
