"""The native engine on the CPU: its model runner, arena, attention, sampler and linears."""
