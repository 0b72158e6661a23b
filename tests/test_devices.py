import pytest

from edgesafe.devices import DatasheetCalibration, PublishedCalibration, get_profile, load_profiles
from edgesafe.errors import EdgesafeError
from edgesafe.models.architectures import TEXT_LENGTH, build_unet
from edgesafe.models.stats import count_macs, count_params

EXPECTED = {"host-cpu", "iphone15", "pixel8", "jetson-orin-nano", "raspberry-pi5"}


def test_shipped_profiles():
    profiles = load_profiles()
    assert EXPECTED <= set(profiles)
    for profile in profiles.values():
        assert profile.provenance()


@pytest.mark.parametrize("name", sorted(EXPECTED - {"host-cpu"}))
def test_estimator_reproduces_its_calibration(name):
    profile = get_profile(name)
    cal = profile.estimator.calibration
    if isinstance(cal, PublishedCalibration):
        # the reference architecture at the reference batch takes the published time (compute-bound)
        assert profile.estimate_ms_per_step(cal.reference_macs, 0) == pytest.approx(cal.published_ms_per_step)
    else:
        assert isinstance(cal, DatasheetCalibration)
        assert profile.estimate_ms_per_step(int(cal.peak_macs_per_s * cal.efficiency), 0) == pytest.approx(1000)


def test_estimate_scales_with_macs_and_respects_bandwidth():
    profile = get_profile("iphone15")
    assert profile.estimate_ms_per_step(2 * 10**11, 0) == pytest.approx(2 * profile.estimate_ms_per_step(10**11, 0))
    # a model that must stream 51.2 GB of weights takes at least a second, whatever its MACs
    assert profile.estimate_ms_per_step(1, int(51.2e9)) == pytest.approx(1000)


def test_measured_profile_has_no_estimate():
    with pytest.raises(EdgesafeError, match="measured, not estimated"):
        get_profile("host-cpu").estimate_ms_per_step(1, 1)


def test_unknown_device():
    with pytest.raises(EdgesafeError, match="unknown device 'abacus'"):
        get_profile("abacus")


@pytest.mark.parametrize("arch", ["sd-1.5", "sd-2.1-base"])
def test_reference_macs_match_the_published_architectures(arch):
    unet = build_unet(arch, device="meta")
    macs = {p.estimator.calibration.reference_batch: p.estimator.calibration.reference_macs
            for p in load_profiles().values()
            if isinstance(getattr(p.estimator, "calibration", None), PublishedCalibration)
            and p.estimator.calibration.reference_model == arch}
    assert macs, f"no profile calibrated on {arch}"
    for batch, expected in macs.items():
        assert count_macs(unet, batch=batch, text_length=TEXT_LENGTH[arch]) == expected
    if arch == "sd-1.5":
        assert count_params(unet) == 859_520_964  # the published SD 1.5 UNet size
