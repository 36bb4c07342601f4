// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'settings',
  title: 'Settings',
  group: 'Project',
  render(ctx, el) {
    mount(el, header('Settings'), h('p', {}, 'Not built yet.'));
  },
};
