//! `proxmox-plugin/install.sh` against a copy of pve-manager's `index.html.tpl`:
//! idempotent, put back by its apt hook after a simulated pve-manager upgrade, and
//! uninstalled to the exact bytes pve-manager shipped. The installed panel script runs
//! under node with a stand-in for ExtJS (`proxmox-plugin/tests/panel.test.js`), and in
//! headless Chromium on a stand-in for PVE's node view (`proxmox-plugin/tests/standin/`,
//! served by `StandInPveApi` with a two-node cluster): the tab frames the node it is
//! opened on, hands that node's signetd the PVE login, passes PVE's theme, and says how
//! to reach a signetd that does not answer.

use std::os::unix::fs::PermissionsExt;

use super::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const PLUGIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../proxmox-plugin");
const MARKER: &str = "<!-- signet-pve-plugin -->";

struct Node {
    dir: tempfile::TempDir,
    /// signetd's web port the installer is told.
    port: String,
}

impl Node {
    /// A pretend PVE node: pve-manager's template from `fixture`, an empty js dir.
    fn new(fixture: &str) -> Node {
        Node::with_port(fixture, 7721)
    }

    /// [`Node::new`] for a signetd web UI on `port`.
    fn with_port(fixture: &str, port: u16) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let n = Node {
            dir,
            port: port.to_string(),
        };
        std::fs::create_dir_all(n.tpl().parent().unwrap()).unwrap();
        std::fs::copy(Path::new(PLUGIN).join("tests").join(fixture), n.tpl()).unwrap();
        std::fs::set_permissions(n.tpl(), std::fs::Permissions::from_mode(0o644)).unwrap();
        n
    }
    fn tpl(&self) -> PathBuf {
        self.dir.path().join("usr/share/pve-manager/index.html.tpl")
    }
    fn js_dir(&self) -> PathBuf {
        self.dir.path().join("usr/share/pve-manager/js")
    }
    fn hook(&self) -> PathBuf {
        self.dir
            .path()
            .join("etc/apt/apt.conf.d/80signet-pve-plugin")
    }
    fn env(&self, cmd: &mut Command) {
        cmd.env("PVE_INDEX_TPL", self.tpl())
            .env("PVE_JS_DIR", self.js_dir())
            .env("SIGNET_APT_HOOK", self.hook())
            .env("SIGNET_WEB_PORT", &self.port);
    }
    fn run(&self, action: &str) -> Output {
        let mut cmd = Command::new(Path::new(PLUGIN).join("install.sh"));
        cmd.arg(action);
        self.env(&mut cmd);
        cmd.output().unwrap()
    }
    fn ok(&self, action: &str) {
        let out = self.run(action);
        assert!(
            out.status.success(),
            "install.sh {action}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fn bytes(&self) -> Vec<u8> {
        std::fs::read(self.tpl()).unwrap()
    }
    /// What apt runs after dpkg: the command in the hook file, through a shell.
    fn run_apt_hook(&self) {
        let hook = std::fs::read_to_string(self.hook()).unwrap();
        let line = hook
            .lines()
            .find(|l| l.starts_with("DPkg::Post-Invoke"))
            .unwrap_or_else(|| panic!("a Post-Invoke hook in:\n{hook}"));
        let start = line.find("{ \"").unwrap() + 3;
        let end = line.rfind("\"; };").unwrap();
        let status = Command::new("sh")
            .arg("-c")
            .arg(&line[start..end])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(PLUGIN).join("tests").join(name)).unwrap()
}

/// `original` with the plugin's line after its pvemanagerlib.js line.
fn with_line(original: &[u8]) -> Vec<u8> {
    let text = String::from_utf8(original.to_vec()).unwrap();
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        out.push_str(line);
        if line.contains("/pve2/js/pvemanagerlib.js") {
            out.push_str("    <script type=\"text/javascript\" src=\"/pve2/js/signet-panel.js\"></script><!-- signet-pve-plugin -->\n");
        }
    }
    out.into_bytes()
}

#[test]
fn the_installer_is_idempotent_survives_an_upgrade_and_restores_the_template_exactly() {
    let node = Node::new("index.html.tpl");
    let original = fixture("index.html.tpl");
    assert_eq!(node.run("status").status.code(), Some(1));

    node.ok("install");
    let installed = node.bytes();
    assert_eq!(installed, with_line(&original), "one line, in its place");
    assert_eq!(
        std::fs::metadata(node.tpl()).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let js = std::fs::read_to_string(node.js_dir().join("signet-panel.js")).unwrap();
    assert!(js.contains("signetPort: '7721'"), "the port is filled in");
    assert!(node.hook().exists());
    node.ok("status");

    // Again and again: nothing changes.
    node.ok("install");
    node.ok("reapply");
    assert_eq!(node.bytes(), installed);
    assert_eq!(
        String::from_utf8(node.bytes())
            .unwrap()
            .matches(MARKER)
            .count(),
        1
    );

    // pve-manager is upgraded: its new template replaces the patched one; apt's hook
    // puts the line back.
    std::fs::copy(
        Path::new(PLUGIN).join("tests/index.html.tpl.upgraded"),
        node.tpl(),
    )
    .unwrap();
    assert_eq!(node.run("status").status.code(), Some(1));
    node.run_apt_hook();
    let upgraded = fixture("index.html.tpl.upgraded");
    assert_eq!(node.bytes(), with_line(&upgraded));
    node.ok("status");
    // The hook runs after every dpkg call; with the line there it changes nothing.
    node.run_apt_hook();
    assert_eq!(node.bytes(), with_line(&upgraded));

    // Uninstalled: the template pve-manager shipped, byte for byte, and nothing else
    // of the plugin left.
    node.ok("uninstall");
    assert_eq!(node.bytes(), upgraded);
    assert!(!node.js_dir().join("signet-panel.js").exists());
    assert!(!node.hook().exists());
    node.ok("uninstall");
    assert_eq!(node.bytes(), upgraded);
    let leftovers: Vec<_> = std::fs::read_dir(node.tpl().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("signet"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // And on the first template too.
    let node = Node::new("index.html.tpl");
    node.ok("install");
    node.ok("uninstall");
    assert_eq!(node.bytes(), original);
}

#[test]
fn a_template_it_does_not_know_is_left_alone() {
    let node = Node::new("index.html.tpl");
    std::fs::write(node.tpl(), "<html><body>not pve-manager</body></html>\n").unwrap();
    let out = node.run("install");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing was changed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(node.bytes(), b"<html><body>not pve-manager</body></html>\n");
    // Without pve-manager the hook does nothing, quietly.
    std::fs::remove_file(node.tpl()).unwrap();
    node.ok("reapply");
    assert!(!node.tpl().exists());
}

#[test]
fn the_installed_panel_adds_the_signing_tab_to_the_node_view() {
    let node = Node::new("index.html.tpl");
    node.ok("install");
    let out = Command::new("node")
        .arg(Path::new(PLUGIN).join("tests/panel.test.js"))
        .arg(node.js_dir().join("signet-panel.js"))
        .output()
        .expect("node is installed (scripts/install-deps.sh)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("https://pve1.example.com:7721/"),
        "the tab frames signetd on the node's host: {stdout}"
    );
    assert!(stdout.contains("panel ok"), "{stdout}");
}

/// Headless Chromium on the stand-in PVE UI of node pve1 (127.0.0.1), in a cluster with
/// pve2 (127.0.0.2), whose signetd serves its web UI; nothing answers on pve1's port.
#[test]
fn in_a_browser_the_tab_frames_the_node_it_is_opened_on_and_says_how_to_reach_one_that_does_not_answer(
) {
    use super::web::{self, Browser};
    use signet_test_support::{ClusterNode, StandInPveApi};

    let mut w = World::new();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let api = rt.block_on(StandInPveApi::start()).unwrap();
    let pin = w.path("pin");
    let agent = w.start_agent(
        &format!("unix:{}", w.path("agent.sock").display()),
        SOFTHSM,
        &pin,
        &[],
    );
    let section = web::web_section_for(&w, &api, "pve2", "127.0.0.2");
    w.start_daemon_with(
        &[&format!("unix:{}", w.path("signetd.sock").display())],
        &agent,
        &format!("[profiles.release]\n{section}"),
    );
    let ui = web::web_ui(&w, rt, api);
    let port: u16 = ui.url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(ui.url.starts_with("https://127.0.0.2:"), "{}", ui.url);

    // The plugin as install.sh installs it, for signetd's port, in the stand-in's UI.
    let node = Node::with_port("index.html.tpl", port);
    node.ok("install");
    let standin = Path::new(PLUGIN).join("tests/standin");
    ui.api.serve_file(
        "/pve2/js/signet-panel.js",
        &node.js_dir().join("signet-panel.js"),
    );
    for f in ["pve.html", "ext.js", "node-view.js"] {
        ui.api
            .serve_file(&format!("/standin/{f}"), &standin.join(f));
    }
    ui.api.set_cluster(&[
        ClusterNode {
            name: "pve1".into(),
            ip: "127.0.0.1".into(),
            local: true,
        },
        ClusterNode {
            name: "pve2".into(),
            ip: "127.0.0.2".into(),
            local: false,
        },
        // A node whose address leads to pve2's signetd (a stale address, say).
        ClusterNode {
            name: "pve3".into(),
            ip: "127.0.0.2".into(),
            local: false,
        },
    ]);
    // root@pam may see the cluster's status (Sys.Audit on /); alice@pve only pve2.
    let admin = ui
        .api
        .login("root@pam", "/nodes/pve2", &["Sys.Audit", "Sys.Modify"]);
    ui.api.grant(&admin, "/", &["Sys.Audit"]);
    let alice = ui.api.login("alice@pve", "/nodes/pve2", &["Sys.Audit"]);
    let login = |ticket: &str, page: &str| {
        format!(
            "{}/standin/login?{}&{}",
            ui.api.url(),
            web::serde_urlencoded_pair("ticket", ticket),
            web::serde_urlencoded_pair("next", &format!("{}{page}", ui.api.url()))
        )
    };

    let mut b = Browser::start(&w);
    b.attach_frames();
    // PVE shows its dark theme (its "Color Theme" cookie).
    b.set_cookie(&ui.api.url(), "PVEThemeCookie", "proxmox-dark");
    // Browsing pve1, the tab of node pve2 frames pve2's signetd, not the browsed host.
    b.open(&login(&admin, "/standin/pve.html?node=pve2"));
    let text = b.wait_until("document.querySelector('iframe.signet-frame') !== null");
    assert!(text.contains("Node pve2"), "{text}");
    let src = b.eval("document.querySelector('iframe.signet-frame').src");
    assert_eq!(
        src,
        format!("https://127.0.0.2:{port}/?theme=proxmox-dark").as_str(),
        "pve2's address from the cluster's status"
    );
    assert_eq!(
        b.eval("document.getElementById('signetUrl').textContent"),
        format!("https://127.0.0.2:{port}/").as_str()
    );
    // The browser has no PVE login for 127.0.0.2: the framed page asks the tab, which
    // hands it over; the page then shows pve2's overview for the PVE user, dark.
    let frame = b.frame_session(&format!("https://127.0.0.2:{port}/"));
    let text = b.in_session(&frame, |b| {
        b.wait_until_across_loads(
            "document.getElementById('verdict') !== null
             && document.body.innerText.includes('root@pam on pve2')",
        )
    });
    assert!(text.contains("Node pve2"), "{text}");
    assert!(text.contains("Signing works"), "{text}");
    let (theme, background) = b.in_session(&frame, |b| {
        (
            b.eval("document.documentElement.dataset.theme"),
            b.background(),
        )
    });
    assert_eq!(theme, "proxmox-dark");
    assert_eq!(background, "rgb(27, 27, 27)", "the dark variant");
    assert_eq!(
        b.eval("document.querySelector('.signet-help').style.display"),
        "none",
        "no help while signetd answers"
    );
    b.screenshot("plugin-node-pve2-dark.png");

    // Another PVE user logs in (without Sys.Audit on /: the tab finds pve2 in its
    // network instead). pve2's signetd still has root@pam's login: the tab hides that
    // page, hands over alice@pve's ticket, and shows pve2 for alice@pve.
    b.open(&login(&alice, "/standin/pve.html?node=pve2"));
    b.wait_until("document.querySelector('iframe.signet-frame') !== null");
    assert_eq!(
        b.eval("document.querySelector('iframe.signet-frame').src"),
        format!("https://127.0.0.2:{port}/?theme=proxmox-dark").as_str(),
        "pve2's address from its network"
    );
    let frame = b.frame_session(&format!("https://127.0.0.2:{port}/"));
    let text = b.in_session(&frame, |b| {
        b.wait_until_across_loads("document.body.innerText.includes('alice@pve on pve2')")
    });
    assert!(!text.contains("root@pam"), "{text}");
    b.wait_until("document.querySelector('iframe.signet-frame').style.visibility === 'visible'");

    // The tab of pve3 frames what answers at pve3's address: pve2's signetd, which says
    // so; the toolbar shows the mismatch.
    b.open(&format!("{}/standin/pve.html?node=pve3", ui.api.url()));
    let text = b.wait_until(
        "document.getElementById('signetNode').textContent.includes('says it runs on')",
    );
    assert!(
        text.contains(&format!(
            "Node pve3 — but signetd at https://127.0.0.2:{port}/ says it runs on node 'pve2'"
        )),
        "{text}"
    );

    // The tab of pve1 (the browsed node, reached under the address bar's name): nothing
    // listens on its port, so the tab says how to reach signetd.
    b.open(&format!("{}/standin/pve.html?node=pve1", ui.api.url()));
    let text = b.wait_until(
        "document.querySelector('.signet-help') !== null
         && document.querySelector('.signet-help').style.display === 'block'",
    );
    let url = format!("https://127.0.0.1:{port}/");
    for want in [
        "Signet's web UI on node pve1 did not answer",
        url.as_str(),
        &format!("listens on TCP port {port}"),
        &format!("IN ACCEPT -p tcp -dport {port}"),
        "open it once in a new tab",
        "systemctl status signetd",
    ] {
        assert!(text.contains(want), "{want} in: {text}");
    }
    assert_eq!(
        b.eval("document.querySelector('iframe.signet-frame').style.display"),
        "none"
    );
    b.screenshot("plugin-unreachable.png");
}
