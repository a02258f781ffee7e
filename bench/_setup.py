"""Shared start-up for bench scripts: a throwaway data dir and database, Django configured."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def django_in_tempdir(prefix: str) -> Path:
    sys.path.insert(0, str(ROOT))
    data_dir = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["BATCHSITE_DATA_DIR"] = str(data_dir)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "batchsite.settings")
    os.environ["DEBUG"] = "0"  # DEBUG keeps every SQL query in memory
    os.environ.setdefault("SECRET_KEY", "bench-only-secret-key")
    os.environ.setdefault("ALLOWED_HOSTS", "testserver,localhost,127.0.0.1")
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)
    from django.db import connections

    connections.close_all()  # children forked later must open their own connection
    return data_dir
