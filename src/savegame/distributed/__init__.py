"""Distributed jobs (torchrun, DDP, FSDP2): one Checkpointer per rank, one checkpoint per save.

``job`` finds the process group and makes savegame's own gloo groups; ``split``
separates what every rank shares from what each rank saves for itself;
``dcp_storage`` is torch.distributed.checkpoint's storage layer writing savegame's
checksummed files and a JSON manifest (never a pickle); ``save`` and ``restore``
run the collective protocols on top. Nothing here runs without a process group.
"""
