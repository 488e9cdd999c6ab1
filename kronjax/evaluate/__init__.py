"""lm-evaluation-harness on kronjax's own model, in process (the `eval` extra).

  lm        KronjaxLM: lm-eval's LM interface (loglikelihood, loglikelihood_rolling,
            generate_until) over a trained run's GPT, no export
  harness   run tasks on a run: lm-eval's task registry plus the shipped offline tasks
  cli       `python -m kronjax.evaluate --workdir W --tasks T [--limit N]`
  make_task the shipped tasks' data (tasks/*.jsonl) from the held-out Shakespeare play
  tasks/    lm-eval YAMLs over local JSONL: the `kronjax_shakespeare` group

Nothing here imports lm_eval at import time: without the extra, the CLI says what to
install in one line.
"""
