"""Synthetic long-context tasks generated for the recipe's tokenizer: HELMET's JSON KV recall
(``json_kv``), passkey retrieval and needle in a haystack (``passkey``)."""
