"""Stage kinds and a recipe's graph of stages: the interface (``base``), the kinds by name
(``registry``), the graph (``graph``), and the built-in kinds: ``data``, ``train``, ``evaluate``."""
