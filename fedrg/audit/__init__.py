"""Auditing, apart from the mechanism it audits (:mod:`fedrg.privacy`).

* :mod:`fedrg.audit.verify`: verify ledgers (chain, signatures, heads) and recompute every
  entry's epsilon independently with dp_accounting (PLD verdict, RDP for information).
* :mod:`fedrg.audit.coverage`: what the DP guarantee covers: training rounds, evaluation
  releases and entries without DP apart, one row per distinct mechanism.
* :mod:`fedrg.audit.policy_check`: each entry's mechanism against a site policy.
* :mod:`fedrg.audit.key_registry`: the public keys an auditor trusts.
* :mod:`fedrg.audit.report`: the self-contained HTML report.
* :mod:`fedrg.audit.canary`, :mod:`fedrg.audit.empirical`: the empirical (canary) audit,
  which trains real models and so sits above model, train and data.

Nothing in :mod:`fedrg.privacy` imports this package.
"""
