"""Screenshots of the operators' console of a running stack, taken by a real headless browser.

    .venv/bin/python scripts/screenshots.py [--base-url http://127.0.0.1:8000] [--order ID]

Needs Debian's chromium and chromium-driver (`apt-get install -y chromium chromium-driver`).
Logs in as a staff user made for the purpose ("console-screenshots", a fresh random password on
every run, set through Django in the stack's database; `manage.py createsuperuser --noinput`
with DJANGO_SUPERUSER_* variables works as well, see --username/--password), then saves full-page
PNGs of the dashboard, the order list, an order page and the channels under docs/screenshots/.
"""

import argparse
import os
import secrets
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.local")

import django  # noqa: E402

django.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from gateway.models import ChargeAttempt  # noqa: E402
from orders.models import Order, OrderStatus  # noqa: E402

OUT = ROOT / "docs" / "screenshots"
WIDTH = 1440
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    f"--window-size={WIDTH},1000",
)


def _staff_user(username: str, password: str | None) -> tuple[str, str]:
    if password:
        return username, password
    password = secrets.token_urlsafe(18)
    user, _ = get_user_model().objects.get_or_create(username=username)
    user.is_staff = user.is_superuser = user.is_active = True
    user.set_password(password)
    user.save()
    return username, password


def _interesting_order() -> str | None:
    """A recent completed order with a story (a failover: a rejected charge first), else the newest."""
    last = ChargeAttempt.objects.order_by("-id").values_list("id", flat=True).first() or 0
    failover = (
        ChargeAttempt.objects.filter(id__gt=last - 200_000, status=ChargeAttempt.Status.REJECTED)
        .filter(order__status=OrderStatus.COMPLETED)
        .order_by("-id")
        .values_list("order_id", flat=True)
        .first()
    )
    newest = Order.objects.order_by("-created_at").values_list("id", flat=True).first()
    order_id = failover or newest
    return str(order_id) if order_id else None


def _driver() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(options=options, service=service)


def _shoot(driver: webdriver.Chrome, url: str, name: str) -> Path:
    driver.get(url)
    WebDriverWait(driver, 15).until(expected_conditions.presence_of_element_located((By.ID, "content")))
    time.sleep(0.3)  # fonts and layout settle
    height = driver.execute_script("return Math.max(document.body.scrollHeight, 600)")
    driver.set_window_size(WIDTH, min(height + 20, 6000))
    path = OUT / f"{name}.png"
    driver.save_screenshot(str(path))
    driver.set_window_size(WIDTH, 1000)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base-url", default=os.environ.get("CONSOLE_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--username", default="console-screenshots")
    parser.add_argument("--password", default=os.environ.get("CONSOLE_PASSWORD"))
    parser.add_argument("--order", help="the order to show (default: a completed one with a story)")
    args = parser.parse_args()
    base = args.base_url.rstrip("/")

    username, password = _staff_user(args.username, args.password)
    order_id = args.order or _interesting_order()
    OUT.mkdir(parents=True, exist_ok=True)
    driver = _driver()
    try:
        driver.get(f"{base}/admin/login/?next=/admin/")
        driver.find_element(By.ID, "id_username").send_keys(username)
        driver.find_element(By.ID, "id_password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
        WebDriverWait(driver, 15).until(
            expected_conditions.presence_of_element_located((By.ID, "user-tools"))
        )
        shots = [
            _shoot(driver, f"{base}/admin/", "admin-index"),
            _shoot(driver, f"{base}/admin/dashboard/", "dashboard"),
            _shoot(driver, f"{base}/admin/orders/order/", "order-list"),
            _shoot(driver, f"{base}/admin/allocation/paymentchannel/", "channels"),
        ]
        if order_id:
            shots.append(_shoot(driver, f"{base}/admin/orders/order/{order_id}/change/", "order-page"))
    finally:
        driver.quit()
    for path in shots:
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
