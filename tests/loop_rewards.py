"""A reward for loop tests on random tiny models: they never solve a task, so reward the parity of the
response's character codes to get groups with non-zero advantages (and therefore real gradients)."""


def length_parity(response: str, sample) -> float:
    return float(sum(map(ord, response)) % 2 == 0)


def nan_for_odd(response: str, sample) -> float:
    """A broken verifier: NaN for half the responses."""
    return float("nan") if sum(map(ord, response)) % 2 else 1.0
