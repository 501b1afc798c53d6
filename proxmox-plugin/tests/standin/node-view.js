// The node view of the stand-in PVE page: ?node=NAME selects the node, as clicking it
// in PVE's resource tree does; the Signing tab is rendered into #tab.
'use strict';
window.standinCaps = { nodes: { 'Sys.Audit': 1 } };
(function() {
    var node = new URLSearchParams(window.location.search).get('node') || 'pve1';
    var tab = StandIn.nodeViewItems(node).filter(function(i) {
        return i.itemId === 'signet-signing';
    })[0];
    tab.pveSelNode = { data: { node: node } };
    window.signetTab = StandIn.render(tab, document.getElementById('tab'));
})();
