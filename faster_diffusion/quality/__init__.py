"""The quality harness for the bundled tiny-shapes model: its data and detector (``shapes``)
and the adherence / fidelity / speed evaluation (``evaluate``). Not needed by ``enable``."""
