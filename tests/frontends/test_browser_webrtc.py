"""The avatar over WebRTC in headless Chromium (the gateway's /webrtc page, its /api/offer): the
browser's microphone (Chromium's fake capture device playing a speech WAV) goes in, the avatar's
video and voice come out; measured from the browser's own getStats() over 20 s."""
from __future__ import annotations

import time

import numpy as np
import pytest

from engine.audio.speech import resample, speech_pcm, write_wav
from tests.frontends.test_browser import CHROMEDRIVER, CHROMIUM, console, gateway_url  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240), pytest.mark.realtime]

SECONDS = 20


@pytest.fixture
def rtc_browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    talk = np.concatenate([speech_pcm(3.0, seed=9), np.zeros(16000, np.float32)])          # 3 s talk, 1 s quiet
    wav = write_wav(tmp_path / "mic.wav", resample(talk, 16000, 48000), 48000)
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
                "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
                "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
                              options=opts)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def stats(driver) -> dict:
    return driver.execute_async_script("window.rtc.stats().then(arguments[arguments.length - 1])")


@pytest.mark.parametrize("codec", [""], ids=["browsers-offer"])
def test_the_avatar_plays_over_webrtc_in_chromium(gateway_url, rtc_browser, codec):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    b = rtc_browser
    b.get(gateway_url + "/webrtc")
    deadline = time.monotonic() + 15
    while "demo" not in b.execute_script("return Array.from(document.querySelectorAll('#avatar option'), o => o.value)"):
        assert time.monotonic() < deadline, console(b)
        time.sleep(0.1)
    Select(b.find_element(By.ID, "codec")).select_by_value(codec)
    b.find_element(By.ID, "mic").click()
    deadline = time.monotonic() + 30
    while (st := stats(b))["video"].get("framesDecoded", 0) < 25:
        assert not st["errors"] and time.monotonic() < deadline, f"{st}\n{console(b)}"
        time.sleep(0.2)
    first = stats(b)
    freezes0 = first["video"].get("freezeCount", 0)
    offsets = []
    for _ in range(SECONDS * 2):
        time.sleep(0.5)
        s = stats(b)
        a, v = s["audio"].get("estimatedPlayoutTimestamp"), s["video"].get("estimatedPlayoutTimestamp")
        if a and v:
            offsets.append(a - v)
    last = stats(b)
    import json
    import urllib.request
    with urllib.request.urlopen(gateway_url + "/api/webrtc", timeout=5) as r:
        (session,) = json.load(r)["sessions"]
    v = last["video"]
    buffered_ms = 1000 * v["jitterBufferDelay"] / max(1, v["jitterBufferEmittedCount"])
    secs = (last["video"]["timestamp"] - first["video"]["timestamp"]) / 1000
    rate = (last["video"]["framesDecoded"] - first["video"]["framesDecoded"]) / secs
    print(f"\nwebrtc in chromium ({codec or 'default'}): {last['video']['codec']} {last['video']['width']}x"
          f"{last['video']['height']}, {rate:.1f} frames/s decoded over {secs:.1f} s, freezes "
          f"{last['video'].get('freezeCount', 0) - freezes0}, audio {last['audio']['codec']} "
          f"{last['audio']['totalSamplesReceived']} samples; playout offset audio - video: median "
          f"{np.median(offsets) if offsets else float('nan'):.0f} ms over {len(offsets)} samples; gateway: audio in "
          f"to frame out p50 {session['latency_ms']['p50']:.0f} / p99 {session['latency_ms']['p99']:.0f} ms, A/V at "
          f"its output {session['av_offset_ms']:.1f} ms; Chromium's jitter buffer {buffered_ms:.0f} ms a frame")
    assert (last["video"]["width"], last["video"]["height"]) == (1280, 720)
    assert rate >= 24.0, rate
    assert last["video"].get("freezeCount", 0) - freezes0 == 0
    assert last["audio"]["totalSamplesReceived"] - first["audio"].get("totalSamplesReceived", 0) > 0.9 * secs * 48000
    if codec:
        assert last["video"]["codec"] == codec
    assert offsets and abs(float(np.median(offsets))) <= 60, offsets
    assert abs(session["av_offset_ms"]) < 40
