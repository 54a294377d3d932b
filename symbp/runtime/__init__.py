"""What drives compiled code, apart from the code generators (``symbp.backends``).

    threads.py    BLAS thread count of the kernels, measured while they run
    workspace.py  scratch arrays kept between calls, one set per batch size
    step.py       the loss-and-gradient call and the fused training step (Numba CPU)
    mpi.py        data-parallel training: shards, one sum over ranks, the update on every rank
    device.py     the CUDA training step with everything on the device; launch and copy
                  counts

Nothing here prints code: a backend compiles a kernel and hands it to these objects.
Modules are imported on first use, so ``import symbp`` loads neither Numba nor mpi4py.
"""
