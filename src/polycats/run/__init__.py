"""The run layer, below train, evaluate and analyze: the run directory and its lock
(:mod:`.directory`), checkpoints (:mod:`.checkpoint`) and the builders of a run's parts from its
config (:mod:`.build`)."""
