// PLACEHOLDER: to be written (issue 17).
import { h, mount, header } from '../lib/dom.js';

export default {
  id: 'keys',
  title: 'API Keys',
  group: 'Project',
  render(ctx, el) {
    mount(el, header('API Keys'), h('p', {}, 'Not built yet.'));
  },
};
