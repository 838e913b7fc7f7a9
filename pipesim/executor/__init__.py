"""The reference executor: the shared scheduling core driven with wall time, MPI messages and torch.

``pipesim run SCENARIO --ranks N`` (``commands``) checks the scenario and launches
``mpiexec -n N python -m pipesim.executor`` (``entry``). Rank 0 is the head (``head``): stage 0, the draft
(``drafts``) and the strategy; further ranks are target stages (``worker``). SPEED runs carry their exit layer,
and the rank holding it sends the early prediction to the head. A PipeSpec chain (``chain``) puts each model on
its own group of ranks, each group's first rank running that model's level of the chain. Messages follow ``protocol`` and
travel through ``messaging`` (optionally delayed by ``emulation.LinkEmulator``); compute is real
(``torch_backend``) or emulated (``emulation.EmulatedStage``). Importing this package imports neither torch
nor mpi4py.
"""
