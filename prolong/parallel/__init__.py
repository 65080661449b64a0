"""Parallelism: the job's world (``world``), the torch-free arithmetic of ranks (``dims``),
``parallelize`` (AC → compile → FSDP2), training engines (FSDP2, DeepSpeed), Ulysses sequence
parallelism and the memory model. Importing the package imports nothing heavy."""
