"""From drift to a new champion without a person: the trigger (``trigger.on_drift``: warm-start
re-fine-tune of the drifted platform from its champion, offline gate), the canary judge
(``canary``: online comparison of ``@champion`` and ``@challenger`` on a share of real traffic,
then promotion or rollback) and the offline gate that leaves a better version as ``@challenger``
(``gate``)."""
