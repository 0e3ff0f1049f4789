"""The kernels' room: the one place that touches the compiled module ``r4t_fast._C``.

- :mod:`~r4t_fast.kernels._backend`: imports ``_C``, ``build_info()``, ``cuda_available()``;
- :mod:`~r4t_fast.kernels._arrays`: array interchange (torch / numpy / DLPack) and input checks;
- :mod:`~r4t_fast.kernels.ops`: the public kernels (validate -> dispatch by device -> ``_C``);
- :mod:`~r4t_fast.kernels.reference`: pure-PyTorch references, the executable spec the tests compare to.
"""
