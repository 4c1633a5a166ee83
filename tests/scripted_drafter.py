"""A drafter that knows the answer: drafting tests script what is guessed."""

from llamazip.runtime.prompt_lookup import Drafter


class ScriptedDrafter(Drafter):
    """Drafts the tokens a plain run generated, with every `wrong`-th one altered:
    the loop meets whole drafts kept, drafts refused at every place, and the row
    after a fully kept draft."""

    def __init__(self, truth: list[int], wrong: int):
        super().__init__(5)
        self.truth, self.wrong, self.calls = truth, wrong, 0

    def propose(self, tokens):
        self.calls += 1
        at = len(tokens)
        draft = list(self.truth[at:at + 1 + self.calls % self.max_draft])
        if self.calls % self.wrong == 0 and draft:
            draft[self.calls % len(draft)] ^= 1
        return draft
