"""Shared by the CLI tests."""


def flat(text: str) -> str:
    """Error text without rich's box drawing and line wrapping."""
    return " ".join(text.replace("│", " ").split())
