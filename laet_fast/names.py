"""The names the toolkit accepts, in one torch-free module: the command line's ``--help`` imports it alone.

Each tuple is the one definition of its kind; the modules that act on a name import it from here.
"""

# How blocks are chosen (laet_fast.methods documents each).
METHODS = ("laet", "laet-cost", "grad_norm", "block_influence", "relative_change", "last", "random", "all")
# The metric each scored method ranks blocks by.
METRIC_OF = {"laet": "probe_acc", "laet-cost": "probe_acc", "grad_norm": "grad_norm",
             "block_influence": "block_influence", "relative_change": "relative_change"}
# The methods that choose without scoring.
SCORE_FREE = ("last", "random", "all")
# The methods that need k, the number of blocks to train (the others size the set themselves without it).
NEEDS_K = ("last", "random", "block_influence", "relative_change")
# The methods that choose from LAET's probes (trained on labelled pooled features) and keep them as heads.
PROBE_METHODS = ("laet", "laet-cost")
# The methods that can choose again while training (``reselect_every``), in laet_fast.Trainer and LaetCallback
# alike: the scored ones from the training steps' own hidden states or gradient norms, ``random`` by a new draw.
RESELECTABLE = ("grad_norm", "block_influence", "relative_change", "random")

# What a run trains for: class labels, next tokens of plain text, answers of instruction or chat rows.
TASKS = ("classify", "lm", "sft")
# Optimizers of the trained blocks (adamw8bit: bitsandbytes' 8-bit AdamW).
OPTIMIZERS = ("adamw", "adamw8bit")
# bitsandbytes storage of the frozen blocks' linear weights (besides none: as loaded).
QUANT_MODES = ("nf4", "fp4", "int8")
# Experiment trackers a run can log to, through accelerate's (``none``: log.jsonl only).
REPORT_TO = ("none", "tensorboard", "wandb", "mlflow", "trackio", "aim", "comet_ml", "dvclive", "swanlab")
