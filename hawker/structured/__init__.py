"""Structured outputs: a request's text constrained to a JSON schema, a regex, a choice of strings or a grammar.

``params.py`` holds what a request asks for (``StructuredOutputsParams``, as
vLLM names it); ``grammars.py`` compiles it with llguidance (cached by
grammar, with a time limit; a bad one is a ``ValueError`` naming the problem)
and keeps one matcher per sequence; ``masks.py`` turns the matchers of a
step's constrained rows into a token bitmask, filled on a worker thread while
the forward pass runs, and applies it to their logits before sampling.
Unconstrained rows pay nothing.
"""
