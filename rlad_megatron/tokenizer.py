"""Tokenizer loading and the teacher/student compatibility check.

TRRD compares the student's and the teacher's log-probs of the *same* token ids, so both models must
use the same tokenizer: same vocabulary (token -> id) and same special ids. We refuse otherwise.
"""

from __future__ import annotations

from pathlib import Path

from rlad_megatron.errors import UserError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json")


def has_tokenizer_files(path: str | Path) -> bool:
    """`path` holds a tokenizer `AutoTokenizer` can load (tokenizer.json or tokenizer_config.json)."""
    return any((Path(path) / name).is_file() for name in TOKENIZER_MARKERS)


def load_tokenizer(path: str | Path, *, flag: str | None = None):
    """`AutoTokenizer.from_pretrained(path)`; UserError (naming `flag` and the dir) when there is no tokenizer or
    it does not load."""
    from transformers import AutoTokenizer

    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_dir():
        raise UserError(f"{where}: no such directory (expected a tokenizer or Hugging Face model dir)")
    if not has_tokenizer_files(path):
        raise UserError(f"{where}: no tokenizer files ({' / '.join(TOKENIZER_MARKERS)}); pass --tokenizer DIR")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{where}: the tokenizer does not load ({type(e).__name__}: {e})") from None


def _special_ids(tok) -> dict[str, int | None]:
    return {k: getattr(tok, f"{k}_token_id", None) for k in ("eos", "bos", "pad", "unk")}


def check_same_tokenizer(student, teacher, *, student_name: str = "student", teacher_name: str = "teacher") -> None:
    """Raise UserError when the two tokenizers could map the same id to different tokens."""
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if s_vocab != t_vocab:
        only_s = sorted(set(s_vocab.items()) - set(t_vocab.items()))[:5]
        only_t = sorted(set(t_vocab.items()) - set(s_vocab.items()))[:5]
        raise UserError(
            f"{student_name} and {teacher_name} tokenizers differ (vocab sizes {len(s_vocab)} vs {len(t_vocab)}; "
            f"e.g. {student_name} has {only_s}, {teacher_name} has {only_t}). TRRD needs the teacher's "
            "log-prob of the student's exact token ids: use a teacher with the same tokenizer."
        )
    s_sp, t_sp = _special_ids(student), _special_ids(teacher)
    if s_sp != t_sp:
        raise UserError(f"{student_name} and {teacher_name} special token ids differ: {s_sp} vs {t_sp}")
