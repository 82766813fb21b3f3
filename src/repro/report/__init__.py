"""The reporting code: the papers' published figures (reference), our runs matched to their tables (results),
the figures, complexity counts (complexity) and Fig. 7's layer responses (responses)."""
