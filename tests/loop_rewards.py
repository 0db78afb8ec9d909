"""A reward for loop tests on random tiny models: they never solve a task, so reward the parity of the
response's character codes to get groups with non-zero advantages (and therefore real gradients)."""


def length_parity(response: str, sample) -> float:
    return float(sum(map(ord, response)) % 2 == 0)


def nan_for_odd(response: str, sample) -> float:
    """A broken verifier: NaN for half the responses."""
    return float("nan") if sum(map(ord, response)) % 2 else 1.0


def all_equal_first_24_calls(response: str, sample) -> float:
    """1.0 for the first 24 calls of a process (with one engine: 8 eval samples and the first dynamic-sampling round
    of 16, whose groups then all have equal rewards), then the length parity."""
    all_equal_first_24_calls.calls = getattr(all_equal_first_24_calls, "calls", 0) + 1
    return 1.0 if all_equal_first_24_calls.calls <= 24 else length_parity(response, sample)


def slow_parity(response: str, sample) -> float:
    """The length parity after 20 ms (a verifier as slow as the simulated generation of one sample)."""
    import time

    time.sleep(0.02)
    return length_parity(response, sample)
