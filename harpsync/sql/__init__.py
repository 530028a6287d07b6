"""The ``sql`` operation's language: parsing (``parser``), expressions and query plans.

``parser`` is the only module that imports sqlglot; it turns a statement into the plain
objects of ``expr`` and ``plan``, which evaluate rows without knowing about storage.
"""
