"""The error of damaged index and embedding folders, and faiss error messages on one line."""

from __future__ import annotations


class IndexFileError(ValueError):
    """An index or embedding folder's files are corrupt, truncated or disagree with each other."""


def faiss_message(error: Exception) -> str:
    # faiss errors span lines ("Error in <C++ signature> at <file>:<line>: <what>"): keep one line.
    return " ".join(str(error).split()) or repr(error)
