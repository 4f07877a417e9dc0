"""SGLang's module layout over plait's language, so SGLang programs' imports keep
working with ``sglang`` replaced by ``plait``: ``from plait.lang.ir import REGEX_INT``,
``plait.lang.api``, ``plait.lang.choices``, ``plait.lang.global_config``. Each module
re-exports plait's own names; the language itself lives one level up (``plait``)."""
