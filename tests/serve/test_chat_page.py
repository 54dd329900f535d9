"""The chat page in headless Chromium (Debian's chromium + chromium-driver, driven by selenium).

Skips only where no browser is installed. What a user does: enter the API key, pick a model, send two
messages; the replies stream in (several updates each), the conversation stays, and tokens/s shows. With JSON
mode on the reply is a JSON object; with tools and tool choice "required" the reply shows as a tool call.
"""

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium/chromedriver installed")


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def test_chat_page_streams_and_keeps_the_conversation(live, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(live.url + "/")
    key = browser.find_element(By.ID, "api-key")
    key.send_keys("sk-test")
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("tiny")
    browser.find_element(By.ID, "system").send_keys("You are terse.")
    temp = browser.find_element(By.ID, "temperature")
    browser.execute_script("arguments[0].value = '0'; arguments[0].dispatchEvent(new Event('input'))", temp)
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("24")
    for i, text in enumerate(["Hello there", "And again"]):
        browser.find_element(By.ID, "prompt").send_keys(text)
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d, n=i + 1: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == n)
    users = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    bots = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert [u.text for u in users] == ["Hello there", "And again"]
    assert len(bots) == 2 and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    for b in bots:
        assert int(b.get_attribute("data-chunks")) > 1  # streamed: the bubble grew piece by piece
    assert "tok/s" in browser.find_element(By.ID, "stats").text
    browser.save_screenshot(str(tmp_path / "chat.png"))


def test_chat_page_json_mode_and_tool_calls(live_long, browser):
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tests.serve.test_structured import TOOLS

    wait = WebDriverWait(browser, 60)
    browser.get(live_long.url + "/")
    key = browser.find_element(By.ID, "api-key")
    key.clear()
    key.send_keys("sk-test")
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 1)
    temp = browser.find_element(By.ID, "temperature")
    browser.execute_script("arguments[0].value = '0'; arguments[0].dispatchEvent(new Event('input'))", temp)
    browser.find_element(By.ID, "json-mode").click()
    browser.find_element(By.ID, "prompt").send_keys("Give me an object")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']"))
    bubble = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    text = bubble.find_element(By.CSS_SELECTOR, "span").text
    assert isinstance(json.loads(text), dict), text
    browser.find_element(By.ID, "json-mode").click()  # off again
    tools = browser.find_element(By.ID, "tools")
    browser.execute_script("arguments[0].value = arguments[1]", tools, json.dumps(TOOLS))
    Select(browser.find_element(By.ID, "tool-choice")).select_by_value("required")
    browser.find_element(By.ID, "prompt").send_keys("What is the weather?")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == 2)
    bubble = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    shown = bubble.find_elements(By.CSS_SELECTOR, ".tool-call")
    assert shown and not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
    names = {t["function"]["name"] for t in TOOLS}
    for el in shown:
        name = el.find_element(By.CSS_SELECTOR, "b").text
        assert name in names and el.text.startswith(name + "(") and el.text.endswith(")")
        json.loads(el.text[len(name) + 1:-1])  # the arguments, assembled from the deltas
    assert "tool_calls" in bubble.find_element(By.CSS_SELECTOR, ".meta").text
