"""SentencePiece for GGUF vocabularies (`tokenizer.ggml.model == "llama"`).

The aim is llama.cpp's token ids for the same text (llm_tokenizer_spm in
src/llama-vocab.cpp):

- Spaces are written "▁" (U+2581). With add_space_prefix, text that starts the
  input or follows a special token gets a space in front first.
- Each character starts as a symbol of its own. Over and over, of all adjacent
  pairs whose joined text is a token, the one with the highest score
  (`tokenizer.ggml.scores`) is merged; on equal scores the leftmost. The text is
  not cut into words first: a merge may cross a space.
- A symbol that is no token at the end (a character the vocabulary lacks) is
  spelled with byte tokens, "<0xXX>".

Special tokens are cut out before text gets here (runtime/tokenizer.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

SPACE = "\u2581"  # ▁


class SentencePieceEncoder:
    """SentencePiece merging over one GGUF vocabulary: text without special tokens -> ids."""

    def __init__(self, tokens: list[str], token_id: dict[str, int], scores: Sequence[float] | None,
                 add_space_prefix: bool, unk_id: int | None):
        self._token_id = token_id
        self._scores = scores if scores is not None else [0.0] * len(tokens)
        self._add_space_prefix = add_space_prefix
        self._byte_ids = [_byte_token(b, token_id, unk_id) for b in range(256)]
        # GGUF strings are read with surrogateescape: encoding the same way gives back the file's bytes
        self.normal_pieces = [t.replace(SPACE, " ").encode("utf-8", "surrogateescape") for t in tokens]

    def encode(self, text: str, after_special: bool) -> list[int]:
        """Ids for `text`, which starts the input or follows a special token when `after_special`."""
        if self._add_space_prefix and after_special:
            text = " " + text
        text = text.replace(" ", SPACE)
        return self._spell(text, self._merge(text))

    def _merge(self, text: str) -> list[int]:
        """The symbols `text` merges into: at each symbol's first character its
        length, 0 at the characters inside it."""
        token_id, scores = self._token_id, self._scores
        n = len(text)
        length = [1] * n
        prev = list(range(-1, n - 1))  # start of the symbol before each symbol

        def candidate(left: int, right: int) -> tuple[float, int, int] | None:
            """The heap entry for joining two adjacent symbols, if that makes a token:
            highest score first, then leftmost."""
            end = right + length[right]
            token = token_id.get(text[left:end])
            return None if token is None else (-scores[token], left, end - left)

        heap = [c for i in range(n - 1) if (c := candidate(i, i + 1)) is not None]
        heapq.heapify(heap)
        while heap:
            _, left, size = heapq.heappop(heap)
            right = left + length[left]
            # stale: `left` was merged into the symbol before it, or either symbol has grown since
            if length[left] == 0 or right >= n or length[left] + length[right] != size:
                continue
            length[left], length[right] = size, 0
            after = left + size
            if after < n:
                prev[after] = left
                if (c := candidate(left, after)) is not None:
                    heapq.heappush(heap, c)
            if prev[left] >= 0 and (c := candidate(prev[left], left)) is not None:
                heapq.heappush(heap, c)
        return length

    def _spell(self, text: str, length: list[int]) -> list[int]:
        """The ids of the merged symbols; byte tokens for a symbol that is no token."""
        ids: list[int] = []
        i = 0
        while i < len(text):
            piece = text[i:i + length[i]]
            token = self._token_id.get(piece)
            if token is not None:
                ids.append(token)
            else:
                for byte in piece.encode("utf-8", "surrogateescape"):
                    if (token := self._byte_ids[byte]) is not None:
                        ids.append(token)
            i += length[i]
        return ids


def _byte_token(byte: int, token_id: dict[str, int], unk_id: int | None) -> int | None:
    """The token that spells `byte`: "<0xXX>", else the byte as text (as llama.cpp
    looks for them). Else the unknown token, or None to drop the byte: llama.cpp
    stops with an error there."""
    found = token_id.get(f"<0x{byte:02X}>")
    if found is None:
        found = token_id.get(bytes([byte]).decode("utf-8", "surrogateescape"))
    return found if found is not None else unk_id
