"""CLI commands of the reward side (filled in by the verifiers/rewards work)."""


def add_commands(sub) -> None:
    return None
