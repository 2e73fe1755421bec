"""The online-RL core, beneath the methods: the typed rollout, the sampler that turns prompts into a
scored rollout, reward scoring and the rollout settings. The advantage estimators are pure functions
of ``pmetal.losses.policy``. Imports neither ``modules/`` nor ``callbacks/`` (tests/unit/test_layers.py)."""
