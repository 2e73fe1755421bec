"""Tool calling (core layer): the one text format (format.py), the tool runner (runner.py: user
functions in worker processes, with a timeout and a result cap) and multi-turn episodes
(episodes.py: a conversation that alternates model turns and tool results, for GRPO; turns.py:
where the model turns are sampled, a decode session or a batch generate)."""
