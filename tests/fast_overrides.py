"""The fast pipeline overrides shared by the suite (the real organism, tiny budgets: seconds per run).

A module of its own, not ``conftest``: tests/slow has a conftest too, and ``import conftest`` would find
whichever was imported first."""
FAST = [
    "data.alignment_n=200", "data.harmful_n=64",
    "align.max_steps=6", "align.batch_size=8",
    "finetune.max_steps=6", "finetune.batch_size=8", "attack.n=64",
    "eval.n_harmful=16", "eval.n_task=16", "eval.max_new_tokens=12",
]
