"""HELMET (Yen et al. 2024) as the ProLong paper evaluates with it: its data files and prompts
(``data``), the tasks read through Hugging Face datasets (``hf``, ``tasks``), running and scoring
them (``run``), and its dataset lists and categories (``datasets``)."""
