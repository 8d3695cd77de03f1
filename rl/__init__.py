"""RL algorithms, drivers, data, config and CLI of vlrl."""
