"""The model judge for HELMET's QA and summarisation: an OpenAI-compatible client (``client``) with
the ProLong model card's rubrics (``rubrics``) or HELMET's scripts' wording (``helmet_rubrics``)."""
