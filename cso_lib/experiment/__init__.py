"""The paper-table experiment at CPU scale (issue 8): a tiny neural policy, SFT'd here, mined by the real
pipeline, trained with DPO / RFT, and evaluated on held-out tasks. SIMULATION world, real models and training.

- `tasks`: the task family (the simulation world with a compact prompt), train / held-out splits,
  demonstrations, batched episodes of a policy, native-format logs.
- `train`: SFT (plain torch loop, assistant tokens only) and DPO (TRL's DPOTrainer).

`bench/paper_table.py` runs the whole table from one command.
"""
