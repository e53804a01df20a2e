# The two commands a fresh machine needs: `make run` and `make test` (each sets everything up first).
.PHONY: setup run chat notebooks test test-fast bench clean

setup:
	@bash scripts/setup.sh

run: setup
	.venv/bin/python apps/workbench_app.py

chat: setup
	.venv/bin/workbench chat --image examples/images/red_circle.png

notebooks: setup
	.venv/bin/jupyter lab --ip 127.0.0.1 --notebook-dir notebooks

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not e2e"

bench: setup
	.venv/bin/python bench/chat_overhead.py

clean:
	rm -rf .venv .pytest_cache
