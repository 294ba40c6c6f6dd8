"""The native engine on a CUDA GPU: its model runner (runner.py, runner_start.py,
runner_step.py), arena, attention, sampler, decode graphs, compact decoder and start-up."""
