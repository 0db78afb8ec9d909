"""Tokenizer loading and the teacher/student compatibility check.

TRRD compares the student's and the teacher's log-probs of the *same* token ids, so both models must
use the same tokenizer: same vocabulary (token -> id) and same special ids. We refuse otherwise.
"""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer_config.json").exists() and not (path / "tokenizer.json").exists():
        raise ValueError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path))


def _special_ids(tok) -> dict[str, int | None]:
    return {k: getattr(tok, f"{k}_token_id", None) for k in ("eos", "bos", "pad", "unk")}


def check_same_tokenizer(student, teacher, *, student_name: str = "student", teacher_name: str = "teacher") -> None:
    """Raise ValueError when the two tokenizers could map the same id to different tokens."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab.items()) - set(t_vocab.items()))[:5]
        only_t = sorted(set(t_vocab.items()) - set(s_vocab.items()))[:5]
        raise ValueError(
            f"{student_name} and {teacher_name} tokenizers differ (vocab sizes {len(s_vocab)} vs {len(t_vocab)}; "
            f"e.g. {student_name} has {only_s}, {teacher_name} has {only_t}). TRRD needs the teacher's "
            "log-prob of the student's exact token ids: use a teacher with the same tokenizer."
        )
    s_sp, t_sp = _special_ids(student), _special_ids(teacher)
    if s_sp != t_sp:
        raise ValueError(f"{student_name} and {teacher_name} special token ids differ: {s_sp} vs {t_sp}")
