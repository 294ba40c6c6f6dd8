"""The device-free part of the native engine: the engine loop, scheduler, blocks, sequences,
engine image, config, and the runner protocol (runner.py) the device wings implement."""
