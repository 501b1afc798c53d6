// Signet: the "Signing" tab in the node view of the Proxmox VE web UI.
//
// It shows signetd's web UI (served by signetd on each node, port @SIGNET_WEB_PORT@,
// with the node's PVE certificate) for the node the tab is opened on: PVE hands the
// node view's panels the selected node (pveSelNode, as PVE.node.Config's own panels
// get it), and the tab finds that node's address in the cluster's status
// (GET /cluster/status: the browsed node is reached under the name in the address bar,
// another node at its IP). No second login: the browser sends its PVE login cookie to
// signetd, which checks it against the PVE API (Sys.Audit on /nodes/NODE to see,
// Sys.Modify to act). install.sh puts this file in /usr/share/pve-manager/js/ and its
// <script> line after pvemanagerlib.js in index.html.tpl.
//
// The framed page is another origin (another port, maybe another host): it tells the
// tab it loaded with a message ({signet: 'ready', node, login}); the tab accepts it
// only from the frame it made and from signetd's exact origin, answers with PVE's
// theme, and shows how to reach signetd (port, firewall, certificate) when no such
// message comes. Another node's signetd gets no PVE cookie from the browser (it
// belongs to the host name in the address bar); when its page asks for a login and
// names the node the tab expects, the tab hands it PVE's ticket, once, addressed to
// that exact origin (docs/SECURITY.md).

Ext.define('Signet.node.Signing', {
    extend: 'Ext.panel.Panel',
    alias: 'widget.signetNodeSigning',

    layout: 'fit',
    border: false,

    // signetd's [web] listen port; install.sh fills it in.
    signetPort: '@SIGNET_WEB_PORT@',

    // How long the page may take to say it loaded, in ms, and how long after the
    // frame's load event (Chromium and Firefox fire it for their own error pages too).
    readyTimeout: 15000,
    afterLoadGrace: 2000,

    initComponent: function() {
        var me = this;
        if (!me.nodename && me.pveSelNode && me.pveSelNode.data) {
            me.nodename = me.pveSelNode.data.node;
        }
        me.theme = Signet.Plugin.theme();

        Ext.apply(me, {
            tbar: [
                {
                    xtype: 'tbtext',
                    itemId: 'signetNode',
                    text: Ext.String.htmlEncode(gettext('Node') + ' ' + me.nodename),
                },
                {
                    text: gettext('Open in new tab'),
                    itemId: 'signetOpen',
                    iconCls: 'fa fa-external-link',
                    disabled: true,
                    handler: function() {
                        if (me.signetUrl) {
                            // On its own the page follows the system's light or dark.
                            window.open(me.signetUrl, '_blank', 'noopener');
                        }
                    },
                },
                {
                    text: gettext('Reload'),
                    itemId: 'signetReload',
                    iconCls: 'fa fa-refresh',
                    handler: function() {
                        me.locate();
                    },
                },
                '->',
                {
                    xtype: 'tbtext',
                    itemId: 'signetUrl',
                    text: '',
                },
            ],
            // Sized by the fit layout; showFrame puts the frame and the help in it.
            items: [
                {
                    xtype: 'component',
                    itemId: 'signetView',
                    style: 'position: relative;',
                },
            ],
        });
        me.callParent();
        me.on('afterrender', me.locate, me);
        me.on('destroy', me.stopWatching, me);
    },

    // Finds the node's address, then frames signetd there.
    locate: function() {
        var me = this;
        me.stopWatching();
        Signet.Plugin.nodeHost(me.nodename, function(host) {
            if (!me.isDestroyed && !me.destroyed) {
                me.showFrame(host);
            }
        });
    },

    stopWatching: function() {
        var me = this;
        if (me.watch) {
            me.watch.stop();
            me.watch = null;
        }
    },

    showFrame: function(host) {
        var me = this;
        var url = Signet.Plugin.url(host, me.signetPort);
        var origin = Signet.Plugin.origin(url);
        me.signetUrl = url;
        me.down('#signetUrl').setText(Ext.String.htmlEncode(url));
        me.down('#signetOpen').setDisabled(false);
        me.down('#signetNode').setText(Ext.String.htmlEncode(gettext('Node') + ' ' + me.nodename));

        var body = me.down('#signetView').getEl().dom;
        while (body.firstChild) {
            body.removeChild(body.firstChild);
        }
        var handedOver = false;
        var frame = document.createElement('iframe');
        frame.className = 'signet-frame';
        frame.title = 'Signet on ' + me.nodename;
        // Shown once the page said it loaded, for this PVE user.
        frame.style.cssText = 'border: 0; width: 100%; height: 100%; display: block; visibility: hidden;';
        var help = document.createElement('div');
        help.className = 'signet-help';
        help.setAttribute('role', 'alert');
        help.style.cssText = 'display: none; padding: 1em 1.5em; overflow: auto; height: 100%; box-sizing: border-box; line-height: 1.5;';
        help.innerHTML = Signet.Plugin.helpHtml(me.nodename, url, me.signetPort);
        help.querySelector('.signet-retry').addEventListener('click', function() {
            me.locate();
        });
        // The address first, so the frame loads nothing else before it.
        frame.src = Signet.Plugin.url(host, me.signetPort, me.theme);
        me.watch = Signet.Plugin.watch(frame, origin, {
            readyTimeout: me.readyTimeout,
            afterLoadGrace: me.afterLoadGrace,
            ready: function(said) {
                help.style.display = 'none';
                frame.style.display = 'block';
                frame.contentWindow.postMessage({ signet: 'theme', theme: me.theme }, origin);
                var text = gettext('Node') + ' ' + me.nodename;
                var user = window.Proxmox && Proxmox.UserName ? Proxmox.UserName : '';
                // A login handed over before PVE's user changed (a logout and another
                // login): the page shows the other user's session.
                var stale = !!(said.user && user && said.user !== user);
                if ((said.login || stale) && said.node === me.nodename && !handedOver) {
                    // signetd on this node has no PVE login from the browser (cookies
                    // belong to the host name in the address bar): hand it PVE's ticket,
                    // once, to the exact origin this tab framed. The ticket is valid on
                    // every node of the cluster; signetd has its own PVE API check it.
                    var ticket = Ext.util.Cookies.get('PVEAuthCookie');
                    if (ticket) {
                        handedOver = true;
                        frame.contentWindow.postMessage({ signet: 'login', ticket: ticket }, origin);
                    }
                }
                // Nothing of another user's session is shown.
                frame.style.visibility = stale ? 'hidden' : 'visible';
                if (stale) {
                    text += ' — ' + Ext.String.format(
                        gettext("signetd there still has the login of {0}; log in to that node's Proxmox VE UI, or close the browser"),
                        said.user);
                }
                if (said.node && said.node !== me.nodename) {
                    // signetd names another node: the address leads elsewhere, or its
                    // [web] node is set to another name.
                    text += ' — ' + Ext.String.format(
                        gettext("but signetd at {0} says it runs on node '{1}'"), url, said.node);
                }
                me.down('#signetNode').setText(Ext.String.htmlEncode(text));
            },
            silent: function() {
                frame.style.display = 'none';
                help.style.display = 'block';
            },
        });
        body.appendChild(help);
        body.appendChild(frame);
    },
});

// The node view builds its tabs (PVE.node.Config) and hands them to PVE.panel.Config,
// which turns them into the navigation tree: the tab goes in just before "Task
// History", for users who may see the node's system state (Sys.Audit).
Ext.define('Signet.panel.Config', {
    override: 'PVE.panel.Config',

    initComponent: function() {
        var me = this;
        if (me.$className === 'PVE.node.Config' && Ext.isArray(me.items)) {
            Signet.Plugin.addSigningTab(me, Ext.state.Manager.get('GuiCap'));
        }
        me.callParent();
    },
});

Ext.define('Signet.Plugin', {
    singleton: true,

    // PVE's themes (proxmox-widget-toolkit's theme_map); anything else is "auto".
    themes: ['crisp', 'proxmox-dark'],

    // Adds the Signing tab to a node view's items once; answers whether it did.
    addSigningTab: function(config, caps) {
        if (!caps || !caps.nodes || !caps.nodes['Sys.Audit']) {
            return false;
        }
        var items = config.items;
        var i;
        for (i = 0; i < items.length; i++) {
            if (items[i].itemId === 'signet-signing') {
                return false;
            }
        }
        var at = items.length;
        for (i = 0; i < items.length; i++) {
            if (items[i].itemId === 'tasks') {
                at = i;
                break;
            }
        }
        items.splice(at, 0, {
            title: gettext('Signing'),
            iconCls: 'fa fa-certificate',
            itemId: 'signet-signing',
            xtype: 'signetNodeSigning',
            nodename: config.pveSelNode && config.pveSelNode.data ? config.pveSelNode.data.node : undefined,
        });
        return true;
    },

    // The theme PVE shows (its PVEThemeCookie, set by "Color Theme"; none or
    // "__default__" is auto: the system's preference).
    theme: function() {
        var t = Ext.util.Cookies.get('PVEThemeCookie');
        return this.themes.indexOf(t) >= 0 ? t : 'auto';
    },

    // Which host the browser reaches `node` at, from the cluster's status entries: the
    // node PVE answers from (local) under the name in the address bar, so the login
    // cookie goes along; another node at its IP; a node not listed by its name.
    hostFor: function(node, entries, browsed) {
        var i;
        for (i = 0; entries && i < entries.length; i++) {
            var e = entries[i];
            if (e && e.type === 'node' && e.name === node) {
                if (e.local) {
                    return browsed;
                }
                return e.ip || node;
            }
        }
        return node;
    },

    // Which address of a node's network (GET /nodes/NODE/network) the browser reaches
    // it at: the interface's with the default gateway, else the first one's up with an
    // IPv4 address (not the loopback); the name in the address bar when it is one of
    // them.
    hostFromNetwork: function(node, interfaces, browsed) {
        var gateway = null;
        var first = null;
        var i;
        for (i = 0; interfaces && i < interfaces.length; i++) {
            var n = interfaces[i];
            if (!n || !n.address || n.type === 'loopback' || n.iface === 'lo') {
                continue;
            }
            if (n.address === browsed) {
                return browsed;
            }
            if (n.gateway && !gateway) {
                gateway = n.address;
            }
            if (n.active && !first) {
                first = n.address;
            }
        }
        return gateway || first || node;
    },

    // Asks PVE where the node is and calls back with its host: the cluster's status
    // (it needs Sys.Audit on /); without it, the name in the address bar when its
    // first label is the node's name, else the node's own network (any PVE user may
    // list it).
    nodeHost: function(node, callback) {
        var me = this;
        var browsed = window.location.hostname;
        var network = function() {
            if (browsed.split('.')[0].toLowerCase() === String(node).toLowerCase()) {
                callback(browsed);
                return;
            }
            Proxmox.Utils.API2Request({
                url: '/nodes/' + encodeURIComponent(node) + '/network',
                method: 'GET',
                success: function(response) {
                    var data = response && response.result ? response.result.data : [];
                    callback(me.hostFromNetwork(node, data, browsed));
                },
                failure: function() {
                    callback(node);
                },
            });
        };
        Proxmox.Utils.API2Request({
            url: '/cluster/status',
            method: 'GET',
            success: function(response) {
                var data = response && response.result ? response.result.data : [];
                callback(me.hostFor(node, data, browsed));
            },
            failure: network,
        });
    },

    // signetd's URL on `host`, with `theme` for the framed page.
    url: function(host, port, theme) {
        if (host.indexOf(':') >= 0 && host.charAt(0) !== '[') {
            host = '[' + host + ']'; // an IPv6 address
        }
        var url = 'https://' + host + ':' + port + '/';
        if (theme) {
            url += '?theme=' + encodeURIComponent(theme);
        }
        return url;
    },

    // The origin a page at `url` sends its messages from, as the browser writes it.
    origin: function(url) {
        return new URL(url).origin;
    },

    // What to do when signetd does not answer in the tab.
    helpHtml: function(node, url, port) {
        var h = Ext.String.htmlEncode;
        var n = h(node);
        var p = h(String(port));
        return '<h2 style="margin-top: 0;">' +
            h(Ext.String.format(gettext("Signet's web UI on node {0} did not answer"), node)) +
            '</h2>' +
            '<p>' + h(gettext('The tab shows signetd from')) + ' <a class="signet-url" href="' + h(url) +
            '" target="_blank" rel="noopener">' + h(url) + '</a>. ' +
            h(gettext('Nothing answered there yet, or the browser refused the page.')) + '</p>' +
            '<ul>' +
            '<li><b>' + h(gettext('Certificate')) + ':</b> ' +
            h(gettext('when the browser does not trust the node\'s certificate yet,')) +
            ' <a href="' + h(url) + '" target="_blank" rel="noopener">' +
            h(gettext('open it once in a new tab')) + '</a> ' +
            h(gettext('to accept the certificate, then come back and try again.')) + '</li>' +
            '<li><b>' + h(gettext('Firewall')) + ':</b> ' +
            h(Ext.String.format(gettext("signetd's web UI listens on TCP port {0} ([web] listen in /etc/signet/signetd.toml)."), port)) +
            ' ' + h(gettext('With the Proxmox VE firewall on, allow it: Datacenter → Firewall (or the node\'s Firewall, or a security group) → Add: direction in, action ACCEPT, protocol tcp, destination port')) +
            ' ' + p + '; ' + h(gettext('in /etc/pve/firewall/cluster.fw that is')) +
            ' <code class="signet-rule">IN ACCEPT -p tcp -dport ' + p + '</code>.</li>' +
            '<li><b>signetd:</b> ' + h(gettext('on node')) + ' ' + n + ', <code>systemctl status signetd</code>; ' +
            h(gettext('its web UI is served only with a [web] section in /etc/signet/signetd.toml.')) + '</li>' +
            '<li><b>' + h(gettext('Framing')) + ':</b> ' +
            h(gettext('signetd lets only Proxmox VE on port 8006 frame its pages; when you reach Proxmox VE at another address (a reverse proxy), add its origin to [web] frame_ancestors.')) +
            '</li>' +
            '</ul>' +
            '<p><button type="button" class="signet-retry">' + h(gettext('Try again')) + '</button></p>';
    },

    // Watches `frame` for the ready message from `origin` (and only from that frame):
    // opts.ready(message) on each page it loads, opts.silent() when none came within
    // opts.readyTimeout ms, or opts.afterLoadGrace ms after the frame's load event.
    // Answers {stop}.
    watch: function(frame, origin, opts) {
        var timer = null;
        // A ready message came since the frame's last load event.
        var heard = false;
        var later = function(ms) {
            clearTimeout(timer);
            timer = setTimeout(opts.silent, ms);
        };
        var onMessage = function(e) {
            if (e.origin !== origin || e.source !== frame.contentWindow) {
                return;
            }
            if (!e.data || e.data.signet !== 'ready') {
                return;
            }
            heard = true;
            clearTimeout(timer);
            opts.ready({
                node: String(e.data.node || ''),
                page: String(e.data.page || ''),
                user: String(e.data.user || ''),
                login: e.data.login === true,
            });
        };
        var onLoad = function() {
            // Each page in the frame says it loaded (before its load event); one that
            // did not (signetd gone since, the browser's error page) shows the help,
            // unless its message is only late.
            if (heard) {
                heard = false;
                return;
            }
            later(opts.afterLoadGrace);
        };
        window.addEventListener('message', onMessage);
        frame.addEventListener('load', onLoad);
        later(opts.readyTimeout);
        return {
            stop: function() {
                clearTimeout(timer);
                window.removeEventListener('message', onMessage);
                frame.removeEventListener('load', onLoad);
            },
        };
    },
});
