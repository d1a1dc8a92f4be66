"""ttt_mixer.eval_tasks: lm-eval task configs for long-context recall and perplexity (to come)."""
