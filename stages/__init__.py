"""tempflow's library: every stage a config dataclass and a run function, called by the command line
(``tempflow_cli``), which this package never imports.

Imports point one way (DESIGN.md §9): the stage modules (``rollout``, ``score``, ``update``,
``evaluate``, ``pretrain``, ``report``, ``init``) and the recommender's (``recsys``) import the
artifact schemas (``artifacts``), the models and rewards (``policies``, ``rewards``, ``worlds``) and
the math (``flow``); all of them import the small modules of ``support``, which import nothing above
them. No stage imports another; tests/test_imports.py holds all of this.
"""
