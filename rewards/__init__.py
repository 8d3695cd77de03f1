"""The hybrid reward: format gate, verifier routing, reward model, combination."""
