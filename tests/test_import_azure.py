"""`rolehost import azure`: Cloud Services files (tests/azure/, written to the published
schema) translated key by key, every element rolehost cannot express named with its XML
path, and hostile XML refused."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import trustme

from rolehost import definition as model
from support.cli import rolehost

AZURE = Path(__file__).parent / "azure"
DEFINITION = "/ServiceDefinition"
WEB = f"{DEFINITION}/WebRole[@name='WebFront']"
WORKER = f"{DEFINITION}/WorkerRole[@name='Worker']"


def translate(folder: str, output: Path) -> tuple[int, dict[str, object], list[str], str]:
    """Exit code, the TOML written, the warned XML paths, and stderr."""
    done = rolehost("import", "azure", str(AZURE / folder / "ServiceDefinition.csdef"),
                    str(AZURE / folder / "ServiceConfiguration.cscfg"), "-o", str(output))
    written = tomllib.loads(output.read_text()) if output.exists() else {}
    paths = re.findall(r"^warning: (/\S+): ", done.stderr, re.M)
    return done.returncode, written, paths, done.stderr


def test_a_worker_role_translates_and_validates_as_it_is(tmp_path: Path) -> None:
    output = tmp_path / "rolehost.toml"
    code, written, paths, err = translate("worker", output)
    assert code == 0, err
    assert written == {
        "service": {"name": "Reports"},
        "roles": {"ReportWorker": {"entry_point": "reportworker:ReportWorker",
                                   "instances": 4, "settings": {"BatchSize": "50"}}},
    }
    assert paths == [f"{DEFINITION}/WorkerRole[@name='ReportWorker']"], err
    assert "fill in entry_point" in err
    assert "# fill in: the module:Class" in output.read_text()
    model.load(output)  # what `rolehost check` validates first


def test_the_platforms_two_role_shape_translates_key_by_key(tmp_path: Path) -> None:
    output = tmp_path / "rolehost.toml"
    code, written, paths, err = translate("shop", output)
    assert written == {
        "service": {"name": "Contoso-Shop", "upgrade_domains": 3},
        "roles": {
            "WebFront": {
                "entry_point": "webfront:WebFront",
                "instances": 2,
                "endpoints": {
                    "HttpIn": {"port": 80, "protocol": "http", "idle_timeout": "4m",
                               "probe": {"path": "/healthz", "interval": "5s",
                                         "unhealthy": 3}},
                    "HttpsIn": {"port": 443, "protocol": "https", "ignore_status": True,
                                "certificate": "certs/SslCert.pem",
                                "key": "certs/SslCert.key"},
                },
                "instance_endpoints": {"Debug": {"public_ports": "10100-10109"}},
                "settings": {
                    "Greeting": "hello",
                    "StorageConnectionString": {
                        "value": "DefaultEndpointsProtocol=https;AccountName=shop;"
                                 "AccountKey=c2VjcmV0", "secret": True},
                },
                "local_resources": {"PageCache": {"size_mb": 512, "clean_on_recycle": True}},
                "startup_tasks": [
                    {"command": "Startup\\InstallTools.cmd", "context": "elevated",
                     "type": "simple", "env": {"MODE": "full"}},
                    {"command": "python tasks/warm.py", "context": "limited",
                     "type": "background"},
                ],
            },
            "Worker": {
                "entry_point": "worker:Worker",
                "instances": 3,
                "internal_endpoints": {"Rpc": {"protocol": "tcp"},
                                       "Admin": {"protocol": "http", "port": 8081}},
                "settings": {"QueueName": "orders"},
                "local_resources": {"Scratch": {"size_mb": 2048, "clean_on_recycle": False}},
                "startup_tasks": [{"command": "python tasks/sidecar.py", "context": "limited",
                                   "type": "foreground"}],
            },
        },
    }
    # Nothing dropped in silence: each element or attribute not translated, by its path.
    endpoints = f"{WEB}/Endpoints"
    assert paths == [
        DEFINITION,  # 'Contoso.Shop' is no rolehost name
        f"{DEFINITION}/@topologyChangeDiscovery",
        WEB,  # the entry point to fill in
        f"{WEB}/@vmsize",
        f"{WEB}/Sites",
        f"{endpoints}/InputEndpoint[@name='HttpIn']/@localPort",
        f"{endpoints}/InputEndpoint[@name='HttpsIn']/@certificate",
        f"{endpoints}/InstanceInputEndpoint[@name='Debug']/@localPort",
        f"{endpoints}/InputEndpoint[@name='Metrics']",  # udp
        f"{WEB}/ConfigurationSettings/Setting"
        "[@name='Microsoft.WindowsAzure.Plugins.Diagnostics.ConnectionString']",
        f"{WEB}/Startup/@priority",
        f"{WEB}/Startup/Task[1]/@commandLine",  # a .cmd
        f"{WEB}/Startup/Task[1]/Environment/Variable[@name='EMULATED']",
        f"{WEB}/Imports/Import[@moduleName='Diagnostics']",
        f"{WEB}/Imports/Import[@moduleName='RemoteAccess']",
        f"{WEB}/Certificates/Certificate[@name='SigningCert']",
        WORKER,
        f"{WORKER}/@vmsize",
        f"{DEFINITION}/LoadBalancerProbes/LoadBalancerProbe[@name='unused']",
        "/ServiceConfiguration/@osFamily",
        "/ServiceConfiguration/@osVersion",
        "/ServiceConfiguration/NetworkConfiguration",
    ], err
    assert "thumbprint 0123456789ABCDEF0123456789ABCDEF01234567" in err
    assert code == 0, err
    # Filled in: the certificate the comment asks for, and the definition is valid.
    certs = tmp_path / "certs"
    certs.mkdir()
    issued = trustme.CA().issue_cert("localhost")
    issued.cert_chain_pems[0].write_to_path(str(certs / "SslCert.pem"))
    issued.private_key_pem.write_to_path(str(certs / "SslCert.key"))
    model.load(output)


@pytest.mark.parametrize("name", ["laughs.csdef", "external.csdef"])
def test_hostile_xml_is_refused_and_nothing_is_written(tmp_path: Path, name: str) -> None:
    output = tmp_path / "rolehost.toml"
    done = rolehost("import", "azure", str(AZURE / "hostile" / name),
                    str(AZURE / "worker" / "ServiceConfiguration.cscfg"), "-o", str(output),
                    timeout=30)
    assert done.returncode == 2, done.stderr
    assert f"{AZURE / 'hostile' / name}: refused: " in done.stderr
    assert "root:" not in done.stdout + done.stderr  # /etc/passwd was never read
    assert not output.exists()


def test_a_file_that_is_no_service_definition_is_named(tmp_path: Path) -> None:
    swapped = rolehost("import", "azure", str(AZURE / "worker" / "ServiceConfiguration.cscfg"),
                       str(AZURE / "worker" / "ServiceDefinition.csdef"), "-o",
                       str(tmp_path / "out.toml"))
    assert swapped.returncode == 2
    assert "expected a <ServiceDefinition> document, found <ServiceConfiguration>" in \
        swapped.stderr
    broken = tmp_path / "broken.csdef"
    broken.write_text("<ServiceDefinition name='x'><WorkerRole>")
    done = rolehost("import", "azure", str(broken), str(AZURE / "worker" /
                    "ServiceConfiguration.cscfg"), "-o", str(tmp_path / "out.toml"))
    assert done.returncode == 2
    assert f"{broken}: not well-formed XML: " in done.stderr
    assert not (tmp_path / "out.toml").exists()


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    output = tmp_path / "rolehost.toml"
    output.write_text("# mine\n")
    code, _, _, err = translate("worker", output)
    assert code == 1
    assert "exists: the import never overwrites a file" in err
    assert output.read_text() == "# mine\n"
